"""From the MLflow runs of a Coupled-VAE study to the paper's tables, plots, a reproduction report
and an evaluated best checkpoint.  Command line: ``python -m analysis --help``.

  store      the MLflow store, experiment, study run and trial runs (the record of studies/record.py)
  runs       MLflow study -> tidy pandas frames -> Parquet (explicit schema)
  selection  runs grouped into cells, paired by seed, named as the paper names its rows
  tables     paper-format table layouts (Table 1/2/3/4/8), mean ± std, paired comparisons
  render     a table as Markdown or LaTeX
  reproduce  our numbers beside the paper's (paper.py), effect directions checked
  plots      PNG figures (matplotlib), logged to the study run
  best       best trial -> checkpoint -> full test evaluation -> evaluation run -> registry alias
"""
