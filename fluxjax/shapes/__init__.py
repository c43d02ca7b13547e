"""The built-in shapes model: its captioned toy dataset and grader, its training recipe, and its packaged weights."""
