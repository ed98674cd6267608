# The metarec images: the library, the consumer service, the producer and the `metarec` CLI.
# No ENTRYPOINT: docker-compose.yml gives each service its command.
#
#   docker build -t metarec:cpu .                                    # consumers, producer
#   docker build -t metarec:train --build-arg EXTRAS=train .         # CPU aggregator
#   docker build -t metarec:gpu --build-arg EXTRAS=train \
#       --build-arg TF_PACKAGE='tensorflow[and-cuda]>=2.21' .        # GPU aggregator
#
# EXTRAS are pyproject.toml's optional dependency groups to install with the package (comma
# separated): none for the consumer image, which then carries no TensorFlow. TF_PACKAGE,
# when set, is the TensorFlow build to install in place of the `train` extra's
# tensorflow-cpu: both builds ship the same `tensorflow` package directory, so installing
# one next to the other would leave whichever landed last.

FROM python:3.11-slim

ARG EXTRAS=""
ARG TF_PACKAGE=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Dependencies first, from pyproject.toml alone, so that a source change reuses this layer;
# the project itself is then installed with --no-deps.
COPY pyproject.toml /tmp/src/pyproject.toml
RUN python -c "import re, sys, tomllib; \
project = tomllib.load(open('/tmp/src/pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
deps = project['dependencies'] + [d for e in extras for d in project['optional-dependencies'][e]]; \
name = lambda d: re.match(r'[A-Za-z0-9._-]+', d).group(0).lower().replace('_', '-'); \
skip = ('tensorflow', 'tensorflow-cpu') if sys.argv[2] else (); \
print(*(d for d in deps if name(d) not in skip), sep='\n')" "$EXTRAS" "$TF_PACKAGE" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt ${TF_PACKAGE:+"$TF_PACKAGE"} \
    && rm /tmp/requirements.txt

COPY . /tmp/src
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src \
    && metarec --version

# A fixed numeric uid, so that `runAsNonRoot`-style checks can verify it without a passwd.
RUN groupadd --gid 10001 metarec \
    && useradd --uid 10001 --gid metarec --create-home --shell /usr/sbin/nologin metarec
USER 10001:10001
WORKDIR /home/metarec

CMD ["metarec", "--help"]
