"""The report from plain data (no torch): report.json's assembly and schema, report.md, report.html with
its SVG charts, qmerge compare, and the model card."""
