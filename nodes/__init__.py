"""The ComfyUI node pack: the only code in this repository that imports ComfyUI."""
