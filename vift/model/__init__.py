"""Models: the offline tiny LVLM, composing and loading any HF LVLM checkpoint.

Import from the submodules (``vift.model.loading``, ``vift.model.tiny``, ...), so that loading a
checkpoint does not depend on the tiny model's code.
"""
