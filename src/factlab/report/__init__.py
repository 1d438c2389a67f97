"""Reports over finished runs, built from the saved run folders alone (read through
experiment.run_folder.RunFolder; no model is loaded): `format` (the one interval format),
`console` (rich tables printed by the CLI), `tables` (rows side by side), `plots` (figures and
each stage's loss.png), `tune` (a study's Pareto front and importances), `influence`
(heatmaps and desiderata of influence runs) and `build` (one self-contained HTML or Markdown
file)."""
