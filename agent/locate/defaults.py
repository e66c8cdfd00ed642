"""The locator's default settings, one set for `locate`, `evaluate` and `screen` (no heavy imports here, so the
command line can show them in --help without loading the image stack)."""

#: Sliding windows, not a grid of patches: they localise to a few pixels.
MODE = "window"
#: Window side (px, odd): a few crystal sizes at the atlas pixel size.
WINDOW_PX = 15
#: Pixels between window centres.
STRIDE_PX = 4
#: Clusters: more than the 2018 study's 3 so that ice balls and debris get clusters of their own.
K = 5
#: Most candidates per image.
MAX_CANDIDATES = 200
