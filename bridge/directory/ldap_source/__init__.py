"""OpenLDAP and Active Directory as a directory source (ldap3, paged search).

Two layers:

* **Pure functions** on plain answers ``{attribute: [values]}`` (values ``bytes`` or
  ``str``, attribute names in any case): GUID decoding, ``userAccountControl``, ranged
  attribute parsing, DN normalisation (:mod:`.entries`); entry -> :class:`PersonRecord` /
  :class:`GroupRecord`, group nesting and manager resolution (:mod:`.dialect`);
  incremental marks and filters (:mod:`.marks`); the stored incremental state
  (:mod:`.state`). They are unit-tested from recorded entries without a server.
* :class:`LdapSource` (:mod:`.source`): the blocking ldap3 work (:mod:`.session`, run in
  ``asyncio.to_thread``) and the incremental state kept in the store's key/value table.

Groups are always read in full and are the truth for membership: a group change does not
touch the member's entry. Nested groups (a member DN that is itself a group read by the
group search) are resolved **locally and transitively** for both dialects when
``nested_groups`` is on (default), cycle-safe. For AD this means nesting through groups
outside the group search base, and ``primaryGroupID`` membership, are not seen; we do not
issue one LDAP_MATCHING_RULE_IN_CHAIN search per group.

Every failure (unreachable server, bind refused, a page that fails, a size limit, a
timeout, a broken answer) raises :class:`DirectoryError`, whose message never contains
the bind password; nothing partial is ever returned and the incremental state is only
saved after a complete read.

Incremental reads (``incremental.mode``): changed users since the stored mark (minus
``overlap_seconds`` for timestamps; AD's ``uSNChanged`` uses ``highestCommittedUSN`` read
before the search), plus one cheap search of every user's stable id (deletes, renames,
the DN -> id map for managers and group members), plus all groups; merged with the
stored people into a complete snapshot. Every ``full_every``-th run, and whenever the
stored state is missing, unreadable or written for a different configuration, is a
full read.
"""

from .dialect import (
    AttrNames,
    GroupRecord,
    PersonRecord,
    assemble,
    entry_to_group,
    entry_to_person,
    resolve_groups,
    stable_id,
)
from .entries import (
    EntryError,
    as_text,
    decode_guid,
    first_text,
    flag_disabled,
    lower_keys,
    normalize_dn,
    parse_range,
    ranged_values,
    uac_disabled,
)
from .marks import and_filter, later_mark, mark_filter, parse_generalized_time
from .source import KV_MARK, KV_PEOPLE, LdapSource

__all__ = [
    "KV_MARK", "KV_PEOPLE", "AttrNames", "EntryError", "GroupRecord", "LdapSource",
    "PersonRecord", "and_filter", "as_text", "assemble", "decode_guid", "entry_to_group",
    "entry_to_person", "first_text", "flag_disabled", "later_mark", "lower_keys",
    "mark_filter", "normalize_dn", "parse_generalized_time", "parse_range", "ranged_values",
    "resolve_groups", "stable_id", "uac_disabled",
]
