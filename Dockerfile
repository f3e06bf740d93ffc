# convpipe's image: the package with Dask and Zarr, and Numba's kernels compiled into its cache,
# so that every scheduler, worker and job container starts without compiling anything.
#
#   docker build -t convpipe .          (docker-compose.yml builds it for you)
#
# The base image is pulled from Docker Hub; where that is unreachable, a local image tagged
# python:3.11-slim serves instead (../shared/docker/engine.sh makes one from Debian bookworm).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Numba's on-disk cache, filled below, root's and read-only: docker-entrypoint.sh gives each
    # container a private writable copy
    NUMBA_CACHE_DIR=/opt/numba-cache \
    # one thread per worker process: Dask runs one process per container, one task at a time
    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

# the dependencies first, from pyproject.toml alone (an empty package stands in for the
# sources), at the versions CI tested (constraints.txt): a layer that a change of convpipe's
# sources does not rebuild
COPY pyproject.toml README.md constraints.txt /tmp/deps/
RUN mkdir /tmp/deps/pipeline && touch /tmp/deps/pipeline/__init__.py \
 && pip install -c /tmp/deps/constraints.txt /tmp/deps \
 && pip uninstall -y convpipe \
 && rm -rf /tmp/deps

# then the package, from a copy of the sources that is removed afterwards: every process (the
# CLI, dask scheduler and worker, the warm-up below) then imports the one installed package,
# whose files are the ones Numba's cache is keyed on
COPY pyproject.toml README.md /tmp/src/
COPY pipeline /tmp/src/pipeline
RUN pip install --no-deps /tmp/src \
 && rm -rf /tmp/src \
 && python -c "import pipeline, distributed, zarr, numba; print('convpipe', pipeline.__version__)"

# compile every kernel once (cache=True) into root's cache, readable by all, writable by none
# other (Numba loads it with pickle); a container on another CPU compiles into its own copy
RUN cd / && python -m pipeline.warmup \
 && chmod -R go-w,a+rX "$NUMBA_CACHE_DIR"
COPY docker-entrypoint.sh /usr/local/bin/convpipe-entrypoint
ENTRYPOINT ["/usr/local/bin/convpipe-entrypoint"]

WORKDIR /srv/convpipe

COPY jobs ./jobs

# an unprivileged user; the data root (a shared volume in docker-compose.yml) belongs to it
RUN useradd --uid 1000 --user-group --create-home convpipe \
 && mkdir -p data \
 && chown convpipe:convpipe data
USER convpipe

# the compose services choose their command: dask scheduler, dask worker, convpipe ...
CMD ["convpipe", "--help"]
