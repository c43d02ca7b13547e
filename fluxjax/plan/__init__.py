"""Planning before running: memory and step estimates, limits checks, and AOT compiles for CPU devices and TPU topologies."""
