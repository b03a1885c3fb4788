"""The PyTorch twin of an hvae.HVAE, the peer of benchmarks/speed.py.

`TorchHVAE(m)` builds the same T-level network as the hvae model `m` out of `torch.nn.Linear`
layers holding copies of m's parameter values (``enc{i}.{j}.weight`` (out, in) maps name for name
onto a Linear's weight), and its `forward(x, eps)` returns hvae's loss for likelihood="bernoulli",
kl="analytic" (README, "The model and the loss"):

    loss = mean_b [ sum_j softplus(l) - x*l  +  sum_i KL_i ],
    KL_T = KL(N(mu_T, exp lv_T) || N(0, I)),  KL_i = KL(N(mu_i, exp lv_i) || N(zhat_i, I)) for i < T,

with zhat_i = dec_{i+1}(z_{i+1}), z_i = mu_i + exp(lv_i / 2) * eps_i and logits l = dec_1(z_1).
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu,
               "leaky_relu": lambda h: F.leaky_relu(h, 0.01)}


def _mlp(widths):
    """Linear layers in -> widths[1] -> ... -> widths[-1] (no activations: forward applies them)."""
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))


class TorchHVAE(nn.Module):
    """The network and loss of the hvae model `m`, with m's current parameter values copied in."""

    def __init__(self, m):
        super().__init__()
        if m.likelihood != "bernoulli" or m.kl != "analytic" or m.deterministic:
            raise ValueError("TorchHVAE: only likelihood='bernoulli', kl='analytic', stochastic")
        dims = [m.x_dim, *m.latent_dims]
        self.latent_dims = list(m.latent_dims)
        self.act = ACTIVATIONS[m.activation]
        self.enc = nn.ModuleList(_mlp([dims[i], *m.hidden_dims[i], 2 * dims[i + 1]])
                                 for i in range(m.n_levels))
        self.dec = nn.ModuleList(_mlp([dims[i + 1], *reversed(m.hidden_dims[i]), dims[i]])
                                 for i in range(m.n_levels))
        self.to(torch.float64 if m.dtype == "float64" else torch.float32)
        self.load_from(m)

    def hvae_named(self):
        """hvae's parameter names -> this module's tensors, in hvae's buffer order."""
        out = {}
        for kind, mlps in (("enc", self.enc), ("dec", self.dec)):
            for i, mlp in enumerate(mlps, start=1):
                for j, layer in enumerate(mlp):
                    out[f"{kind}{i}.{j}.weight"] = layer.weight
                    out[f"{kind}{i}.{j}.bias"] = layer.bias
        return out

    @torch.no_grad()
    def load_from(self, m):
        """Copy m's parameter values in (names and shapes must match exactly)."""
        mine, theirs = self.hvae_named(), m.named_params()
        if list(mine) != list(theirs):
            raise ValueError(f"TorchHVAE: parameter names differ from hvae's: {list(theirs)}")
        for name, p in theirs.items():
            mine[name].copy_(torch.from_numpy(np.array(p)))

    def flat(self, grads=False):
        """Parameters (or their gradients) as one NumPy vector in hvae's flat layout."""
        ts = [p.grad if grads else p for p in self.hvae_named().values()]
        return torch.cat([t.detach().reshape(-1) for t in ts]).numpy()

    def _run(self, mlp, h):
        for layer in mlp[:-1]:
            h = self.act(layer(h))
        return mlp[-1](h)

    def forward(self, x, eps):
        """hvae's loss of the batch x (B, D) with noise eps (T tensors (B, d_i))."""
        mulv, z, h = [], [], x
        for i, d in enumerate(self.latent_dims):
            out = self._run(self.enc[i], h)
            mu, lv = out[:, :d], out[:, d:]
            h = mu + torch.exp(0.5 * lv) * eps[i]
            mulv.append((mu, lv))
            z.append(h)
        logits = self._run(self.dec[0], z[0])
        total = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        for i, (mu, lv) in enumerate(mulv):
            diff = mu if i == len(mulv) - 1 else mu - self._run(self.dec[i + 1], z[i + 1])
            total = total + 0.5 * torch.sum(diff * diff + torch.exp(lv) - 1.0 - lv)
        return total / x.shape[0]
