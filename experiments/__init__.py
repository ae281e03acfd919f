"""Experiment and benchmark scripts (experiments/README.md); a package so scripts import each other
as `experiments.<name>` without sys.path edits. Run one as `python experiments/<name>.py` or
`python -m experiments.<name>`."""
