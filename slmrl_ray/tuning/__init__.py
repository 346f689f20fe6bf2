"""Ray Tune grids and searches over the study's configurations, and their report."""
