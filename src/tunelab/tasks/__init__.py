"""Tasks: what is learned (the data → model inputs mapping, the model class, prediction). One module each."""
