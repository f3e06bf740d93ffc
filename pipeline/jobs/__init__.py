"""Job specs, submission to a Dask cluster, job state and logs, TLS."""
