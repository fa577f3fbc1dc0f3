#!/usr/bin/env python3
"""Runs a real `helm lint` (Helm's own library, through helm-sdkpy) on a chart.
Exit 1 on any warning or error (Helm severities: 1 info, 2 warning, 3 error)."""
import asyncio
import json
import sys

import helm_sdkpy

chart = sys.argv[1] if len(sys.argv) > 1 else "charts/strata"
result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart))
print(json.dumps(result, indent=2))
bad = [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= 2]
if bad or result.get("Errors"):
    print(f"helm lint of {chart}: {len(bad)} warning(s)/error(s): {bad} {result.get('Errors')}", file=sys.stderr)
    sys.exit(1)
print(f"helm lint of {chart}: clean ({len(result.get('Messages') or [])} info message(s))")
