//! One group's state and the rules that change it, sans-IO: every operation takes the state
//! and a request and returns the new state's event, or why it is refused. Storage and
//! fan-out are in [`super`].

use ringpost_wire::limits::{GROUP_INVITE_CODE_BYTES, GROUP_MEMBERS_MAX, GROUP_META_BYTES_MAX};
use ringpost_wire::{
    GroupEvent, GroupId, GroupInfo, GroupInvite, GroupPermission, GroupUpdate, UserId,
};
use serde::{Deserialize, Serialize};

use super::GroupError;

/// Who may do something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Allowed {
    Members,
    Admins,
}

impl Allowed {
    fn wire(self) -> GroupPermission {
        match self {
            Allowed::Members => GroupPermission::Members,
            Allowed::Admins => GroupPermission::Admins,
        }
    }

    fn from_wire(p: GroupPermission) -> Option<Allowed> {
        match p {
            GroupPermission::Unchanged => None,
            GroupPermission::Members => Some(Allowed::Members),
            GroupPermission::Admins => Some(Allowed::Admins),
        }
    }
}

/// A group as its owner stores it (one row, at most ~16 KiB: 1024 members of 8 bytes, the
/// admins, 4 KiB of metadata).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub group: GroupId,
    /// The group sequence: the seq of the last change or message. Every change and every
    /// message takes the next one, so a member sees both in one order.
    pub seq: u64,
    /// Sorted, without duplicates; at most [`GROUP_MEMBERS_MAX`].
    pub members: Vec<UserId>,
    /// Sorted; always members.
    pub admins: Vec<UserId>,
    /// Opaque (encrypted by the clients); at most [`GROUP_META_BYTES_MAX`].
    pub meta: Vec<u8>,
    pub send: Allowed,
    pub edit: Allowed,
    /// The current invite code, if an admin made one.
    pub invite_code: Option<[u8; GROUP_INVITE_CODE_BYTES]>,
}

impl GroupState {
    /// A new group: `creator` is its first admin and member, `members` the others. Its
    /// creation is seq 1.
    pub fn create(
        group: GroupId,
        creator: UserId,
        members: &[UserId],
        meta: &[u8],
    ) -> Result<(GroupState, GroupEvent), GroupError> {
        if meta.len() > GROUP_META_BYTES_MAX {
            return Err(GroupError::LimitExceeded("group metadata too long"));
        }
        let mut all: Vec<UserId> = members.to_vec();
        all.push(creator);
        all.sort_unstable();
        all.dedup();
        if all.len() > GROUP_MEMBERS_MAX {
            return Err(GroupError::LimitExceeded(
                "more than GROUP_MEMBERS_MAX members",
            ));
        }
        let state = GroupState {
            group,
            seq: 1,
            members: all.clone(),
            admins: vec![creator],
            meta: meta.to_vec(),
            send: Allowed::Members,
            edit: Allowed::Members,
            invite_code: None,
        };
        let event = GroupEvent {
            group,
            seq: 1,
            actor: creator,
            added: all,
            promoted: vec![creator],
            meta_changed: !meta.is_empty(),
            rotate_sender_keys: true,
            ..Default::default()
        };
        Ok((state, event))
    }

    pub fn is_member(&self, user: UserId) -> bool {
        self.members.binary_search(&user).is_ok()
    }

    pub fn is_admin(&self, user: UserId) -> bool {
        self.admins.binary_search(&user).is_ok()
    }

    /// Whether `user` may send a message to the group now.
    pub fn may_send(&self, user: UserId) -> Result<(), GroupError> {
        if !self.is_member(user) {
            return Err(GroupError::NotMember);
        }
        if self.send == Allowed::Admins && !self.is_admin(user) {
            return Err(GroupError::Forbidden("only admins may send to this group"));
        }
        Ok(())
    }

    /// The state as `asker` (a member) may see it: the invite code only for admins.
    pub fn info_for(&self, asker: UserId) -> Result<GroupInfo, GroupError> {
        if !self.is_member(asker) {
            return Err(GroupError::NotMember);
        }
        let invite_code = match (self.is_admin(asker), self.invite_code) {
            (true, Some(code)) => code.to_vec().into(),
            _ => Default::default(),
        };
        Ok(GroupInfo {
            group: self.group,
            version: self.seq,
            members: self.members.clone(),
            admins: self.admins.clone(),
            meta: self.meta.clone().into(),
            send: self.send.wire(),
            edit: self.edit.wire(),
            invite_code,
        })
    }

    /// Applies `update` by `actor`, with `new_code` as the code should it create an invite.
    /// On success the state has moved to the next seq and the event says what changed; on a
    /// refusal the state is unchanged. An update that changes nothing is refused (Malformed),
    /// so every seq is a real change.
    ///
    /// `may_add(actor, added)` is asked for every user the update adds: the blocking hook
    /// ([`super::AddPolicy`]).
    pub fn apply(
        &mut self,
        actor: UserId,
        update: &GroupUpdate,
        new_code: [u8; GROUP_INVITE_CODE_BYTES],
        may_add: &dyn Fn(UserId, UserId) -> bool,
    ) -> Result<GroupEvent, GroupError> {
        let mut next = self.clone();
        next.seq = self.seq + 1;
        let mut event = GroupEvent {
            group: self.group,
            seq: next.seq,
            actor,
            ..Default::default()
        };
        let others_empty = update.add.is_empty()
            && update.remove.is_empty()
            && update.promote.is_empty()
            && update.demote.is_empty()
            && update.meta.is_empty()
            && update.send == GroupPermission::Unchanged
            && update.edit == GroupPermission::Unchanged
            && update.invite == GroupInvite::Keep;

        if !update.join_code.is_empty() {
            if !others_empty || update.leave {
                return Err(GroupError::Malformed("a join asks nothing else"));
            }
            if self.is_member(actor) {
                return Err(GroupError::Malformed("already a member"));
            }
            match self.invite_code {
                Some(code) if code[..] == update.join_code[..] => {}
                _ => return Err(GroupError::Forbidden("no such invite code")),
            }
            if self.members.len() >= GROUP_MEMBERS_MAX {
                return Err(GroupError::LimitExceeded("the group is full"));
            }
            insert_sorted(&mut next.members, actor);
            event.added = vec![actor];
            event.rotate_sender_keys = true;
            *self = next;
            return Ok(event);
        }

        if !self.is_member(actor) {
            return Err(GroupError::NotMember);
        }
        if update.leave {
            if !others_empty {
                return Err(GroupError::Malformed("a leave asks nothing else"));
            }
            remove_sorted(&mut next.members, actor);
            remove_sorted(&mut next.admins, actor);
            // A group never loses its last admin while it has members: the longest-standing
            // (lowest id, deterministically) member is promoted.
            if next.admins.is_empty() {
                if let Some(&first) = next.members.first() {
                    next.admins.push(first);
                    event.promoted = vec![first];
                }
            }
            event.removed = vec![actor];
            event.rotate_sender_keys = true;
            *self = next;
            return Ok(event);
        }
        if others_empty {
            return Err(GroupError::Malformed("the update changes nothing"));
        }
        let admin = self.is_admin(actor);
        let membership = !update.add.is_empty()
            || !update.remove.is_empty()
            || !update.promote.is_empty()
            || !update.demote.is_empty();
        let settings = update.send != GroupPermission::Unchanged
            || update.edit != GroupPermission::Unchanged
            || update.invite != GroupInvite::Keep;
        if (membership || settings) && !admin {
            return Err(GroupError::Forbidden(
                "only admins change members, admins and settings",
            ));
        }
        if !update.meta.is_empty() && self.edit == Allowed::Admins && !admin {
            return Err(GroupError::Forbidden(
                "only admins may edit this group's info",
            ));
        }
        if update.meta.len() > GROUP_META_BYTES_MAX {
            return Err(GroupError::LimitExceeded("group metadata too long"));
        }

        for &u in &update.add {
            if next.is_member(u) {
                continue;
            }
            if !may_add(actor, u) {
                return Err(GroupError::Forbidden(
                    "a user cannot be added to this group",
                ));
            }
            insert_sorted(&mut next.members, u);
            event.added.push(u);
        }
        for &u in &update.remove {
            if u == actor {
                return Err(GroupError::Malformed("leave the group with `leave`"));
            }
            if remove_sorted(&mut next.members, u) {
                remove_sorted(&mut next.admins, u);
                event.removed.push(u);
            }
        }
        if next.members.len() > GROUP_MEMBERS_MAX {
            return Err(GroupError::LimitExceeded(
                "more than GROUP_MEMBERS_MAX members",
            ));
        }
        for &u in &update.promote {
            if !next.is_member(u) {
                return Err(GroupError::Malformed("only members can be promoted"));
            }
            if insert_sorted(&mut next.admins, u) {
                event.promoted.push(u);
            }
        }
        for &u in &update.demote {
            if remove_sorted(&mut next.admins, u) {
                event.demoted.push(u);
            }
        }
        if next.admins.is_empty() {
            return Err(GroupError::Malformed("a group keeps at least one admin"));
        }
        if !update.meta.is_empty() && next.meta[..] != update.meta[..] {
            next.meta = update.meta.to_vec();
            event.meta_changed = true;
        }
        if let Some(a) = Allowed::from_wire(update.send) {
            event.settings_changed |= next.send != a;
            next.send = a;
        }
        if let Some(a) = Allowed::from_wire(update.edit) {
            event.settings_changed |= next.edit != a;
            next.edit = a;
        }
        match update.invite {
            GroupInvite::Keep => {}
            GroupInvite::Create => {
                next.invite_code = Some(new_code);
                event.settings_changed = true;
            }
            GroupInvite::Revoke => {
                event.settings_changed |= next.invite_code.take().is_some();
            }
        }
        event.rotate_sender_keys = !event.added.is_empty() || !event.removed.is_empty();
        let changed = event.rotate_sender_keys
            || !event.promoted.is_empty()
            || !event.demoted.is_empty()
            || event.meta_changed
            || event.settings_changed;
        if !changed {
            // Already so (a retried update, an add of a member): no new seq, nothing logged.
            event.seq = self.seq;
            return Ok(event);
        }
        *self = next;
        Ok(event)
    }
}

/// Inserts into a sorted list; false if it was there.
fn insert_sorted(list: &mut Vec<UserId>, u: UserId) -> bool {
    match list.binary_search(&u) {
        Ok(_) => false,
        Err(i) => {
            list.insert(i, u);
            true
        }
    }
}

/// Removes from a sorted list; false if it was not there.
fn remove_sorted(list: &mut Vec<UserId>, u: UserId) -> bool {
    match list.binary_search(&u) {
        Ok(i) => {
            list.remove(i);
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GroupId = [7; 16];
    const CODE: [u8; 16] = [9; 16];

    fn any(_: UserId, _: UserId) -> bool {
        true
    }

    fn group() -> GroupState {
        GroupState::create(G, 1, &[2, 3], b"title").unwrap().0
    }

    #[test]
    fn creation_makes_the_creator_admin_and_is_seq_1() {
        let (s, e) = GroupState::create(G, 5, &[3, 3, 9], b"").unwrap();
        assert_eq!(s.members, vec![3, 5, 9]);
        assert_eq!(s.admins, vec![5]);
        assert_eq!((s.seq, e.seq), (1, 1));
        assert_eq!(e.added, vec![3, 5, 9]);
        assert!(e.rotate_sender_keys);
        let too_many: Vec<UserId> = (10..10 + GROUP_MEMBERS_MAX as u64).collect();
        assert!(matches!(
            GroupState::create(G, 1, &too_many, b""),
            Err(GroupError::LimitExceeded(_))
        ));
    }

    #[test]
    fn only_admins_change_membership_and_a_refusal_changes_nothing() {
        let mut s = group();
        let mut u = GroupUpdate::new(G);
        u.add = vec![4];
        let before = s.clone();
        assert!(matches!(
            s.apply(2, &u, CODE, &any),
            Err(GroupError::Forbidden(_))
        ));
        assert_eq!(s, before);
        assert!(matches!(
            s.apply(8, &u, CODE, &any),
            Err(GroupError::NotMember)
        ));
        let e = s.apply(1, &u, CODE, &any).unwrap();
        assert_eq!(
            (e.seq, e.added.clone(), e.rotate_sender_keys),
            (2, vec![4], true)
        );
        assert!(s.is_member(4));
    }

    #[test]
    fn the_blocking_hook_refuses_an_add() {
        let mut s = group();
        let mut u = GroupUpdate::new(G);
        u.add = vec![4];
        let refuse_4 = |_: UserId, added: UserId| added != 4;
        assert!(matches!(
            s.apply(1, &u, CODE, &refuse_4),
            Err(GroupError::Forbidden(_))
        ));
        assert!(!s.is_member(4));
    }

    #[test]
    fn promote_demote_remove_and_the_last_admin() {
        let mut s = group();
        let mut u = GroupUpdate::new(G);
        u.promote = vec![2];
        assert_eq!(s.apply(1, &u, CODE, &any).unwrap().promoted, vec![2]);
        let mut u = GroupUpdate::new(G);
        u.demote = vec![1, 2];
        assert!(matches!(
            s.apply(1, &u, CODE, &any),
            Err(GroupError::Malformed(_))
        ));
        let mut u = GroupUpdate::new(G);
        u.remove = vec![2];
        let e = s.apply(1, &u, CODE, &any).unwrap();
        assert_eq!(e.removed, vec![2]);
        assert_eq!(s.admins, vec![1]);
        // The last admin leaves: the lowest remaining member is promoted.
        let mut u = GroupUpdate::new(G);
        u.leave = true;
        let e = s.apply(1, &u, CODE, &any).unwrap();
        assert_eq!((e.removed.clone(), e.promoted.clone()), (vec![1], vec![3]));
        assert_eq!((s.members.clone(), s.admins.clone()), (vec![3], vec![3]));
    }

    #[test]
    fn settings_decide_who_sends_and_edits() {
        let mut s = group();
        let mut u = GroupUpdate::new(G);
        u.send = GroupPermission::Admins;
        u.edit = GroupPermission::Admins;
        assert!(s.apply(1, &u, CODE, &any).unwrap().settings_changed);
        assert!(matches!(s.may_send(2), Err(GroupError::Forbidden(_))));
        assert!(s.may_send(1).is_ok());
        assert!(matches!(s.may_send(99), Err(GroupError::NotMember)));
        let mut u = GroupUpdate::new(G);
        u.meta = b"new".to_vec().into();
        assert!(matches!(
            s.apply(2, &u, CODE, &any),
            Err(GroupError::Forbidden(_))
        ));
        assert!(s.apply(1, &u, CODE, &any).unwrap().meta_changed);
    }

    #[test]
    fn invite_codes_let_anyone_join_until_revoked() {
        let mut s = group();
        let mut join = GroupUpdate::new(G);
        join.join_code = CODE.to_vec().into();
        assert!(matches!(
            s.apply(8, &join, CODE, &any),
            Err(GroupError::Forbidden(_))
        ));
        let mut u = GroupUpdate::new(G);
        u.invite = GroupInvite::Create;
        s.apply(1, &u, CODE, &any).unwrap();
        assert_eq!(s.info_for(1).unwrap().invite_code[..], CODE);
        assert!(s.info_for(2).unwrap().invite_code.is_empty());
        let e = s.apply(8, &join, CODE, &any).unwrap();
        assert_eq!((e.actor, e.added.clone()), (8, vec![8]));
        let mut u = GroupUpdate::new(G);
        u.invite = GroupInvite::Revoke;
        s.apply(1, &u, CODE, &any).unwrap();
        assert!(matches!(
            s.apply(9, &join, CODE, &any),
            Err(GroupError::Forbidden(_))
        ));
    }

    #[test]
    fn info_is_for_members_only() {
        let s = group();
        assert!(matches!(s.info_for(42), Err(GroupError::NotMember)));
        assert_eq!(s.info_for(2).unwrap().members, vec![1, 2, 3]);
    }
}
