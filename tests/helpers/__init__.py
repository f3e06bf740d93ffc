"""Helpers shared by the test areas: builders of data and stores, the test job kind, clusters
of in-process and real worker processes, and the one wait helper."""
