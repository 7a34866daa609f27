// The CUDA runtime and half types, as tests/simt/simt.h emulates them on the CPU.
#pragma once
#include "../simt.h"
