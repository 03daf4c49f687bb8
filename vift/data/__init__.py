"""Data: the ShapeTally world, manifest formats and streaming loaders, the import contract.

Import from the submodules (``vift.data.manifests``, ``vift.data.generate``, ...): a package that
re-exported them would make every stage that reads a manifest depend on the generator too.
"""
