/* f32.c - the float32 build of the generic core (layers.c + model.c). */
#include "layers.c"
#include "model.c"
