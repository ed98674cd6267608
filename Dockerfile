# The metarec image: the library, the consumer service, the producer and the `metarec` CLI.
# No ENTRYPOINT: docker-compose.yml gives each service its command.
#
#   docker build -t metarec:cpu .
#   docker build -t metarec:gpu --build-arg TF_PACKAGE='tensorflow[and-cuda]==2.21.0' .
#
# TF_PACKAGE is the TensorFlow build to install in place of the project's own
# `tensorflow-cpu` dependency: the CPU wheel by default, `tensorflow[and-cuda]` for the GPU
# aggregator, or empty for none (an arm64 image, which pyproject.toml's marker also skips).
# Keep its default equal to the pin in pyproject.toml (tests/test_compose.py checks it).

FROM python:3.11-slim

ARG TF_PACKAGE=tensorflow-cpu==2.21.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=1

# Dependencies first, from pyproject.toml alone, so that a source change reuses this layer.
# Both TensorFlow builds ship the same `tensorflow` package directory, so installing the GPU
# build next to the declared tensorflow-cpu would leave whichever landed last: the declared
# one is filtered out here and the project itself is then installed with --no-deps.
COPY pyproject.toml /tmp/src/pyproject.toml
RUN python -c "import re, tomllib; \
deps = tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']['dependencies']; \
name = lambda d: re.match(r'[A-Za-z0-9._-]+', d).group(0).lower().replace('_', '-'); \
print(*(d for d in deps if name(d) not in ('tensorflow', 'tensorflow-cpu')), sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt ${TF_PACKAGE:+"$TF_PACKAGE"} \
    && rm /tmp/requirements.txt

COPY . /tmp/src
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src \
    && metarec --help > /dev/null

# A fixed numeric uid, so that `runAsNonRoot`-style checks can verify it without a passwd.
RUN groupadd --gid 10001 metarec \
    && useradd --uid 10001 --gid metarec --create-home --shell /usr/sbin/nologin metarec
USER 10001:10001
WORKDIR /home/metarec

CMD ["metarec", "--help"]
