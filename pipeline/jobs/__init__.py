"""Jobs on a Dask cluster.

- ``spec``: job specs (TOML + ``--set``) and their validation;
- ``kinds``: what each kind of job (prepare, train, evaluate) checks and runs;
- ``records``: a job's files on the data root and its events on the scheduler;
- ``runner``: on a worker: the preflight checks and the job's coordinator (``run_job``);
- ``client``: submit, resume, cancel, status and logs, through the scheduler;
- ``files_view``: status from the files alone, without a scheduler.
"""
