/* f64.c - the float64 build of the generic core (layers.c + model.c). */
#define HVAE_DOUBLE 1
#include "layers.c"
#include "model.c"
