"""The PyTorch twin of an hvae.HVAE, the peer of benchmarks/speed.py.

`TorchHVAE(m)` builds the same T-level network as the hvae model `m` out of `torch.nn.Linear`
layers holding copies of m's parameter values (``enc{i}.{j}.weight`` (out, in) maps name for name
onto a Linear's weight), and its `forward(x, eps)` returns hvae's loss for likelihood="bernoulli",
kl="analytic", written from the math (README, "The model and the loss"; DESIGN.md sections 1, 2
and 6), not from the C:

    loss = mean_b [ sum_j softplus(l) - x*l  +  sum_i KL_i ],   logits l = dec_1(z_1),

with every KL between two diagonal Gaussians in closed form,

    KL(N(mu, e^lv) || N(m, e^s)) = 1/2 sum (s - lv + (e^lv + (mu - m)^2) e^-s - 1),

(s = 0 when p has unit variance; m = s = 0 for the top level's N(0, I)).

- inference="bottom_up" (the default): z_i = mu_i + exp(lv_i / 2) * eps_i with
  [mu_i, lv_i] = enc_i(z_{i-1}) (z_0 = x); KL_i = KL(N(mu_i, e^lv_i) || p(z_i | z_{i+1})) for
  i < T, where p(z_i | z_{i+1}) = N(m_i, e^s_i), [m_i, s_i] = dec_{i+1}(z_{i+1}) (m_i alone and
  s_i = 0 with prior_variance="unit").
- inference="top_down" (DESIGN.md section 6, the Ladder VAE): a deterministic bottom-up pass
  d_0 = x, d_i = enc_i's last hidden activation of d_{i-1}, [mu^_i, lv^_i] = enc_i's output layer
  at d_i; then top-down q(z_T | x) = N(mu^_T, e^lv^_T) and, for i = T-1 .. 1 at the sampled
  z_{i+1}, [m_i, s_i] = dec_{i+1}(z_{i+1}) merged with (mu^_i, lv^_i) by precision:
  prec = e^-lv^_i + e^-s_i, var_q = 1/prec, mu_q = (mu^_i e^-lv^_i + m_i e^-s_i) var_q,
  z_i = mu_q + sqrt(var_q) eps_i; KL_i = KL(N(mu_q, var_q) || N(m_i, e^s_i)).

The MLPs, the likelihood and the KL are shared by the two chains.
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


def gauss_kl(mu, lv, m=None, s=None, var=None, inv_prior_var=None):
    """Summed KL(N(mu, e^lv) || N(m, e^s)) over all elements (closed form).

    m=None: prior mean 0; s=None: prior variance 1. var = e^lv and inv_prior_var = e^-s may be
    passed when the caller has them already.
    """
    diff = mu if m is None else mu - m
    var = torch.exp(lv) if var is None else var
    if s is None:
        return 0.5 * torch.sum(diff * diff + var - 1.0 - lv)
    inv_prior_var = torch.exp(-s) if inv_prior_var is None else inv_prior_var
    return 0.5 * torch.sum((diff * diff + var) * inv_prior_var - 1.0 - lv + s)


class TorchHVAE(nn.Module):
    """The network and loss of the hvae model `m`, with m's current parameter values copied in."""

    def __init__(self, m):
        super().__init__()
        if m.likelihood != "bernoulli" or m.kl != "analytic" or m.deterministic:
            raise ValueError("TorchHVAE: only likelihood='bernoulli', kl='analytic', stochastic")
        inference = getattr(m, "inference", "bottom_up")
        prior_variance = getattr(m, "prior_variance", "unit")
        if inference not in ("bottom_up", "top_down"):
            raise ValueError(f"TorchHVAE: unknown inference {inference!r}")
        dims = [m.x_dim, *m.latent_dims]
        self.latent_dims = list(m.latent_dims)
        self.top_down = inference == "top_down"
        self.learned = prior_variance == "learned"
        self.act = ACTIVATIONS[m.activation]
        # encoder i's input: z_{i-1} bottom-up; d_{i-1}, the last hidden width of level i-1,
        # top-down (x for i = 1 in both)
        ins = [m.x_dim] + [m.hidden_dims[i - 1][-1] if self.top_down else dims[i]
                           for i in range(1, m.n_levels)]
        # decoder i >= 2's output: m_{i-1}, or [m_{i-1}, s_{i-1}] with a learned variance
        outs = [m.x_dim] + [(2 if self.learned else 1) * dims[i] for i in range(1, m.n_levels)]
        self.enc = nn.ModuleList(_mlp([ins[i], *m.hidden_dims[i], 2 * dims[i + 1]])
                                 for i in range(m.n_levels))
        self.dec = nn.ModuleList(_mlp([dims[i + 1], *reversed(m.hidden_dims[i]), outs[i]])
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
            if tuple(mine[name].shape) != tuple(p.shape):
                raise ValueError(f"TorchHVAE: {name} has shape {tuple(p.shape)} in hvae, "
                                 f"{tuple(mine[name].shape)} here")
            mine[name].copy_(torch.from_numpy(np.array(p)))

    def flat(self, grads=False):
        """Parameters (or their gradients) as one NumPy vector in hvae's flat layout."""
        ts = [p.grad if grads else p for p in self.hvae_named().values()]
        return torch.cat([t.detach().reshape(-1) for t in ts]).numpy()

    def _hidden(self, mlp, h):
        """The activation of mlp's last hidden layer."""
        for layer in mlp[:-1]:
            h = self.act(layer(h))
        return h

    def _run(self, mlp, h):
        return mlp[-1](self._hidden(mlp, h))

    def _prior(self, i, z):
        """(m_i, s_i) of p(z_i | z_{i+1} = z), 0-based i < T-1; s_i None with unit variance."""
        out = self._run(self.dec[i + 1], z)
        if not self.learned:
            return out, None
        d = self.latent_dims[i]
        return out[:, :d], out[:, d:]

    def forward(self, x, eps):
        """hvae's loss of the batch x (B, D) with noise eps (T tensors (B, d_i))."""
        z0, kl = (self._top_down if self.top_down else self._bottom_up)(x, eps)
        logits = self._run(self.dec[0], z0)
        total = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") + kl
        return total / x.shape[0]

    def _bottom_up(self, x, eps):
        """(z_1, summed KL) of the bottom-up chain q(z_i | z_{i-1})."""
        mulv, z, h = [], [], x
        for i, d in enumerate(self.latent_dims):
            out = self._run(self.enc[i], h)
            mu, lv = out[:, :d], out[:, d:]
            h = mu + torch.exp(0.5 * lv) * eps[i]
            mulv.append((mu, lv))
            z.append(h)
        total = 0.0
        for i, (mu, lv) in enumerate(mulv):
            if i == len(mulv) - 1:
                total = total + gauss_kl(mu, lv)
            else:
                total = total + gauss_kl(mu, lv, *self._prior(i, z[i + 1]))
        return z[0], total

    def _top_down(self, x, eps):
        """(z_1, summed KL) of the Ladder VAE's top-down chain (DESIGN.md section 6)."""
        T, ladder, h = len(self.latent_dims), [], x
        for i, d in enumerate(self.latent_dims):  # deterministic bottom-up pass
            h = self._hidden(self.enc[i], h)      # d_i
            out = self.enc[i][-1](h)
            ladder.append((out[:, :d], out[:, d:]))
        mu, lv = ladder[T - 1]
        z = mu + torch.exp(0.5 * lv) * eps[T - 1]
        total = gauss_kl(mu, lv)
        for i in reversed(range(T - 1)):  # top-down: merge, sample, KL at the sampled z_{i+1}
            m, s = self._prior(i, z)
            mu_hat, lv_hat = ladder[i]
            a = torch.exp(-lv_hat)
            b = 1.0 if s is None else torch.exp(-s)
            prec = a + b
            var_q = 1.0 / prec
            mu_q = (mu_hat * a + m * b) * var_q
            lv_q = -torch.log(prec)
            z = mu_q + torch.sqrt(var_q) * eps[i]
            total = total + gauss_kl(mu_q, lv_q, m, s, var=var_q,
                                     inv_prior_var=None if s is None else b)
        return z, total
