"""FLUX.1-schnell served through Truss: API adapter, engine, compile and cache."""
