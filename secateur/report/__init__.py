"""Tables, plots and one HTML/Markdown page per set of runs."""
