/* f64.c - the float64 build of the generic core (vecmath.c + layers.c + model.c + step.c). */
#define HVAE_DOUBLE 1
#include "vecmath.c"
#include "layers.c"
#include "model.c"
#include "step.c"
