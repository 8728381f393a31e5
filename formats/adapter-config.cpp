// PLACEHOLDER until the adapter work lands.
#include "formats/adapter-config.h"
