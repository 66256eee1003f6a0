"""Built-in plugins of atomforge.

Each module here is a plugin like any third-party package: it implements ``register_*`` hooks
and is loaded by name from :data:`atomforge.registry.DEFAULT_PLUGINS`. Modules never import each
other; they reach other plugins only through the registry.
"""
