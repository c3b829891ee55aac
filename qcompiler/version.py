"""qcompiler's version, in a module of its own: the modules that stamp it into artifacts,
cache keys and tuning logs import it from here, never from the ``qcompiler`` package, whose
facade functions import the driver (an import cycle otherwise)."""
__version__ = "0.1.0"
