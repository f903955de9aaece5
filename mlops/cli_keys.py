"""``mlops keys``: the approval signing key on this machine and the keyring that verifies approvals.

    mlops keys show                       where the private key and the keyring are, and what they hold
    mlops keys rotate [--revoke-old]      a new signing key; the old public key stays (retired) unless revoked
    mlops keys revoke KEY_ID              drop a key from the keyring: what it signed stops verifying
    mlops keys export-public [-o FILE]    the keyring as JSON, for the endpoint's and the flow's machines
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_keys(args: argparse.Namespace) -> None:
    from ml.errors import RegistryError
    from ml.io import atomic_write_text
    from registry import signing

    if args.action == "rotate":
        old, new = signing.rotate_key(revoke_old=args.revoke_old)
        kept = ("revoked: approvals it signed no longer verify" if args.revoke_old else
                "kept in the keyring (retired): approvals it signed still verify")
        print(f"new signing key {new} in {signing.private_key_path()}"
              + (f"; old key {old} {kept}" if old else ""))
        print(f"keyring {signing.keyring_path()} updated; give the endpoint its public keys: "
              "mlops keys export-public -o FILE")
        return
    keyring = signing.Keyring.load(args.keyring)
    if args.action == "revoke":
        keyring.revoke(args.key_id)
        keyring.save()
        print(f"key {args.key_id} removed from {keyring.path}; approvals it signed no longer verify there")
        return
    if args.action == "export-public":
        if not keyring.keys:
            raise RegistryError(f"keyring {keyring.path}: holds no keys yet; the first `mlops models approve` "
                                "(or `mlops keys rotate`) creates the signing key")
        text = json.dumps(keyring.to_dict(), indent=2) + "\n"
        if args.output:
            atomic_write_text(args.output, text)
            print(f"{len(keyring.keys)} public key(s) written to {args.output}")
        else:
            print(text, end="")
        return
    path = signing.private_key_path()
    own = signing.signer_key_id(signing.load_private_key(create=False)) if path.exists() else None
    print(f"signing key: {path}" + (f" ({own})" if own else " (none yet: created by the first approval)"))
    print(f"keyring:     {keyring.path} ({len(keyring.keys)} key(s))")
    for entry in keyring.keys:
        state = f"retired {entry.retired}" if entry.retired else "current"
        mine = "  <- this machine's signing key" if entry.key_id == own else ""
        print(f"  {entry.key_id}  created {entry.created}  {state}  {entry.comment}{mine}")
    if own and keyring.find(own) is None:
        print(f"warning: the signing key {own} is not in this keyring; approvals it signs will not verify here")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="the approval signing key and the keyring that verifies approvals")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="where the signing key and the keyring are, and the keys they hold")
    rotate = actions.add_parser("rotate", help="a new signing key (also after losing one); old public keys stay")
    rotate.add_argument("--revoke-old", action="store_true",
                        help="drop the old public keys (a stolen key): approvals they signed stop verifying")
    export = actions.add_parser("export-public", help="the keyring's public keys as JSON")
    export.add_argument("-o", "--output", help="write to this file instead of standard output")
    revoke = actions.add_parser("revoke", help="drop a key from the keyring (a lost key that may be stolen)")
    revoke.add_argument("key_id", help="the key's id, as `mlops keys show` lists it (ed25519:...)")
    for sub in (show, export, revoke):
        sub.add_argument("--keyring", help="keyring file (default: $MLOPS_APPROVAL_KEYRING, else the config dir's)")
    rotate.set_defaults(keyring=None)
    for sub in (show, rotate, export, revoke):
        sub.set_defaults(func=cmd_keys)
