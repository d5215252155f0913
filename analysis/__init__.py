"""From the MLflow runs of a Coupled-VAE study to the paper's tables, plots, a reproduction report
and an evaluated best checkpoint.  Command line: ``python -m analysis --help``.

  runs       MLflow study -> tidy pandas frames -> Parquet (explicit schema)
  tables     paper-format tables (Table 1/2/3/4/8 layouts), mean ± std, paired comparisons
  reproduce  our numbers beside the paper's (paper.py), effect directions checked
  plots      PNG figures (matplotlib), logged to the study run
  best       best trial -> checkpoint -> full test evaluation -> evaluation run -> registry alias
"""
