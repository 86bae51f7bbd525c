"""Built-in device backends (registered as `nodeplug.device_backends` entry points)."""
