"""The HTTP side: the proxy port's handler, header rules and upstream errors."""
