"""Tools around the server: model converters."""
