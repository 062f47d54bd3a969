"""Reports: store rows -> aggregated grids -> observations -> figures -> a static site. No torch."""
