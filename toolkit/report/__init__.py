"""Reports: tables (Table 1) and figures (sample grids, curves) from evaluation results."""
