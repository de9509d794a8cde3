# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""GenDeg's (CVPR 2025) quantisation of a pair's degradation severity, shared by the data tools that measure it
(`data.degradations.severity`) and the degradation pipeline that is prompted with it (`degrade_prompt`): the mean mu
and the population std sigma of |HQ - LQ| on the [0, 1] scale, each in 128 equal bins over its range."""

SEVERITY_BINS = 128
SEVERITY_MU_RANGE = (0.0, 0.7)
SEVERITY_SIGMA_RANGE = (0.0, 0.4)
