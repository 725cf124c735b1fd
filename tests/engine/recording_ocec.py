"""`python -m ocec`, with every decode-cache write and every CRC-32 check of a cache entry recorded as a
line "<event> <machine> <rank>" in $OCEC_RECORD: a test counts them per machine of a torchrun job."""

import os
import sys

from ocec.cli import main
from ocec.data import decode


def recorded(event: str, original):
    def wrapper(*args, **kwargs):
        with open(os.environ["OCEC_RECORD"], "a") as log:
            log.write(f"{event} {os.environ.get('GROUP_RANK', 0)} {os.environ.get('RANK', 0)}\n")
        return original(*args, **kwargs)

    return wrapper


decode._write_entry = recorded("decode", decode._write_entry)
decode.crc32_of_file = recorded("crc", decode.crc32_of_file)
sys.exit(main(sys.argv[1:]))
