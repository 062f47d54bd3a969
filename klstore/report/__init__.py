"""Reports: store rows -> immutable grids (grid.Grid) -> figures with their scale, noise floor and
observations (figure.Figure) -> drawings -> a static site. No torch."""
