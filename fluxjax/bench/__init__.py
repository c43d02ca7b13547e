"""Benchmarks behind `fluxjax bench NAME`: each module NAME here has `main(argv)`.

Every figure is printed next to the PyTorch reference measured in the same run, as a ratio.
"""
