# vmafx-sidecar image: docker build -t ghcr.io/vmafx/vmafx-sidecar:<version> .
# The build stage is the only one with pip, a shell and compilers; it installs the sidecar and its
# runtime dependencies (numpy, onnx) into /app, the one directory the distroless stage copies.
FROM python:3.13-slim-trixie AS build
WORKDIR /src
COPY pyproject.toml README.md vmafx_sidecar.py vmafx_feedback.py vmafx_onnx_builder.py ./
# Pruned after the install: pip's console scripts (the image runs `python3 -m`), and the test suites and test
# data the wheels ship, nearly a third of the layer: every `tests` package (numpy's, one per subpackage;
# nothing outside a test run imports one) and onnx's unit tests and backend conformance suite (onnx/test,
# onnx/backend/test: only onnx's doc generator imports them). Then what the sidecar loads, on first use too
# (numpy.random, onnx.reference's operators), must import from /app alone (-S: no site-packages; -P: not
# /src's sources; -B: no timestamp .pyc for compileall to keep), so a rule that removed too much fails the
# build. Unchecked-hash .pyc files stay valid whatever mtimes the copy gives the sources, so the read-only
# container never compiles anything at start. tests/test_image.py runs this very step.
RUN pip install --no-cache-dir --no-compile --target /app . \
 && rm -r /app/bin \
 && find /app -depth -type d \( -name tests -o -path "/app/onnx/*" -name test \) -exec rm -r {} + \
 && PYTHONPATH=/app python -S -P -B -c "import vmafx_sidecar, numpy.random, onnx.reference.ops" \
 && python -m compileall -q --invalidation-mode unchecked-hash /app

# Python 3.13, as in the build stage: the copied extension modules are built for it.
FROM gcr.io/distroless/python3-debian13:nonroot
COPY --from=build /app /app
ENV PYTHONPATH=/app
USER 65532:65532
ENTRYPOINT ["/usr/bin/python3", "-m", "vmafx_sidecar"]
CMD ["serve"]
