"""Support for tests, benchmarks, the main job and the command-line tools: a headless ComfyUI
with the pack loaded through its own loader, project-made random models, graph files. The
engine never imports it."""
