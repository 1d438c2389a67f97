"""Reports over finished runs, built from the saved run folders alone (read through
experiment.run_folder.RunFolder; no model is loaded): `format` (the one interval format),
`console` (rich tables printed by the CLI), `tables` (rows side by side), `plots` (figures and
each stage's loss.png) and `build` (one self-contained HTML or Markdown file)."""
