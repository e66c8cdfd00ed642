"""The locator: find crystal-bearing areas in low-magnification images by clustering patch statistics.

Pure image work (arrays in, pixel targets out); imports no driver.

- `features`: `grid_features(image, rows, cols)`, `window_features(image, window_px, stride_px)`,
  `iter_window_features` (streaming), `FEATURE_NAMES`.
- `preprocess`: hot/dead pixels, readout stripes, uneven illumination, masked pixels.
- `cluster`: scaler -> PCA -> k-means / agglomerative (`fit_clusters`), `suggest_k`, bar and black-area
  filters (`two_step_black_cells`, `mesh_mask`, `large_dark_mask`, `black_pixel_mask`).
- `analysis`: `LocateSettings`, `analyse(image, settings) -> ClusterAnalysis` (with `ClusterSummary`
  per cluster, normalised centroids for label memory, the default crystal-cluster rule).
- `similarity`: cosine similarity maps to reference patches.
- `objects`: the objects inside candidate regions (split at necks; ice balls, film lines, faint ones dropped).
- `object_features`: each object's features, its significance against the film's noise, the cold-start rule.
- `film_lines`: folds, tears and carbon edges found as whole lines.
- `targets`: `find_candidates`, `Candidate` (one per object, with its features).
- `defaults`: the one default setting of `locate`, `evaluate` and `screen`.
- `render`: `heatmap_rgb`, `heatmap_png`, `similarity_rgb`, `cluster_gallery_rgb`, `display_uint8`.
- `tiled`: the same features over montages tile by tile (bounded memory).
"""
