"""From a prompt to an image: FluxPipeline (sources, defaults, components), text encoding and conditioning inputs."""
