"""Reports over finished runs: tables, plots and a self-contained HTML (or Markdown) file,
built from the saved run folders alone (no model is loaded)."""
