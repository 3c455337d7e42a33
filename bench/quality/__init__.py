"""Quality benchmark: does the compressed cache answer like the full one? (docs/quality.md)

python -m bench.quality            # the full grid (CPU, about an hour on 2 cores)
python -m bench.quality --quick    # a few minutes
python -m bench.quality --device cuda
"""
