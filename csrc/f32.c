/* f32.c - the float32 build of the generic core (vecmath.c, layers.c, noise_fill.c,
 * sparse.c, iwae.c, model.c, topdown.c, step.c). */
#include "vecmath.c"
#include "layers.c"
#include "noise_fill.c"
#include "sparse.c"
#include "iwae.c"
#include "model.c"
#include "topdown.c"
#include "step.c"
