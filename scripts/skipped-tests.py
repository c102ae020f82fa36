#!/usr/bin/env python3
"""Prints, for `ctest -I`, the numbers of the tests a CTest JUnit file reports skipped
(nothing where none were). usage: skipped-tests.py RESULTS.xml (run in the build folder)."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

skipped = {case.get("name") for case in ElementTree.parse(sys.argv[1]).getroot().iter("testcase")
           if case.find("skipped") is not None}
listing = json.loads(subprocess.run(["ctest", "--show-only=json-v1"], check=True, capture_output=True,
                                    text=True).stdout)
# CTest numbers its tests from 1, in the order it lists them.
numbers = [str(n) for n, test in enumerate(listing["tests"], start=1) if test["name"] in skipped]
if numbers:
    print("0,0,0," + ",".join(numbers))
