"""Tables, Table 2, plots and the report, from trial records alone."""
