"""A scripted stack-cube expert: privileged state (cube and tool poses) → IK-relative 7-d actions.

Two pick-and-place rounds (red onto blue, then green onto red), each a fixed sequence of phases:

    approach  above the cube, hand pointing down, yaw aligned with a cube face
    descend   fingertips at the cube's centre height
    close     close the gripper and wait for the fingers to settle
    lift      straight up to a safe height
    move      above the target cube, yaw aligned with the target's faces
    lower     until the carried cube sits just above the target
    release   open the gripper and wait
    retreat   straight up

Every env runs its own phase (batched on torch), so one expert drives any number of envs. The grasp yaw is
the cube-face direction that keeps the open fingers farthest from the other cubes, and of the two equivalent
yaws the one that turns the hand least (keeps joint 7 inside its limits).
"""

from __future__ import annotations

import math

import torch

from envs.assets import BLOCK_SIZE

APPROACH, DESCEND, CLOSE, LIFT, MOVE, LOWER, RELEASE, RETREAT, DONE = range(9)
PHASE_NAMES = ["approach", "descend", "close", "lift", "move", "lower", "release", "retreat", "done"]
# (cube to pick, cube to place it on) per round; indices into cube_pos: 0 blue, 1 red, 2 green
ROUNDS = ((1, 0), (2, 1))

ACTION_SCALE = 0.5  # the task's IK action scale: action × 0.5 = metres / radians per step
SAFE_Z = 0.15  # travel height of the tool centre point [m]
HOVER = 0.08  # approach height above the cube's centre [m]
MAX_STEP = 0.02  # largest commanded translation per step [m]
MAX_TURN = 0.15  # largest commanded rotation per step [rad]
GAIN = 0.6  # fraction of the remaining error commanded per step
GRIP_STEPS = 12  # steps to wait for the gripper to close / open
PHASE_TIMEOUT = 80  # steps before a phase gives up waiting for its tolerance and moves on


def _quat_conj(q: torch.Tensor) -> torch.Tensor:
    return torch.cat([-q[..., :3], q[..., 3:]], dim=-1)


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # xyzw
    ax, ay, az, aw = a.unbind(-1)
    bx, by, bz, bw = b.unbind(-1)
    return torch.stack(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ],
        dim=-1,
    )


def _axis_angle(q: torch.Tensor) -> torch.Tensor:
    q = torch.where(q[..., 3:4] < 0, -q, q)
    sin_half = q[..., :3].norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(sin_half, q[..., 3:4])
    return q[..., :3] * torch.where(sin_half > 1e-8, angle / sin_half.clamp_min(1e-8), torch.full_like(angle, 2.0))


def down_quat(yaw: torch.Tensor) -> torch.Tensor:
    """xyzw orientation of a hand pointing straight down with its x axis at `yaw` (Rz(yaw)·Rx(π))."""
    half = yaw / 2
    zero = torch.zeros_like(yaw)
    return torch.stack([torch.cos(half), torch.sin(half), zero, zero], dim=-1)


def hand_yaw(q: torch.Tensor) -> torch.Tensor:
    """Yaw of the hand's x axis projected on the table."""
    x, y, z, w = q.unbind(-1)
    return torch.atan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z))


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _cube_yaw(q: torch.Tensor) -> torch.Tensor:
    x, y, z, w = q.unbind(-1)
    return torch.atan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z))


def grasp_yaw(cube_pos: torch.Tensor, cube_quat: torch.Tensor, pick: int, current_yaw: torch.Tensor) -> torch.Tensor:
    """Hand yaw to grasp cube `pick`: fingers along a cube face, clear of other cubes, least turning."""
    n = cube_pos.shape[0]
    base = _cube_yaw(cube_quat[:, pick])
    candidates = base[:, None] + torch.arange(4, device=base.device) * (math.pi / 2)  # [n, 4]
    # fingers open along the hand's y axis: direction (−sin ψ, cos ψ); finger tips ±5 cm from the centre
    finger_dir = torch.stack([-torch.sin(candidates), torch.cos(candidates)], dim=-1)  # [n, 4, 2]
    centre = cube_pos[:, pick, None, :2]
    tips = torch.stack([centre + 0.05 * finger_dir, centre - 0.05 * finger_dir], dim=2)  # [n, 4, 2, 2]
    others = [i for i in range(cube_pos.shape[1]) if i != pick]
    clearance = torch.full((n, 4), float("inf"), device=base.device)
    for o in others:
        d = (tips - cube_pos[:, o, None, None, :2]).norm(dim=-1).min(dim=-1).values
        clearance = torch.minimum(clearance, d)
    turn = _wrap(candidates - current_yaw[:, None]).abs()
    # prefer clearance (in 1 cm bins, so near-ties go to the smaller turn), then the smaller turn
    score = torch.floor(clearance.clamp(max=0.12) / 0.01) * 10 - turn
    best = score.argmax(dim=1)
    return current_yaw + _wrap(candidates.gather(1, best[:, None]).squeeze(1) - current_yaw)


class StackExpert:
    """Batched state-machine expert. Call `reset(env_ids)` when envs restart, `act(priv)` every step."""

    def __init__(self, num_envs: int, device: str | torch.device = "cpu"):
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.phase = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.round = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.timer = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.yaw = torch.zeros(num_envs, device=self.device)
        self.yaw_set = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    def reset(self, env_ids: torch.Tensor | None = None) -> None:
        ids = slice(None) if env_ids is None else env_ids.to(self.device)
        self.phase[ids] = APPROACH
        self.round[ids] = 0
        self.timer[ids] = 0
        self.yaw_set[ids] = False

    @torch.no_grad()
    def act(self, priv: dict[str, torch.Tensor]) -> torch.Tensor:
        tcp_pos, tcp_quat = priv["tcp_pos"].to(self.device), priv["tcp_quat"].to(self.device)
        cube_pos, cube_quat = priv["cube_pos"].to(self.device), priv["cube_quat"].to(self.device)
        n = self.num_envs
        rows = torch.arange(n, device=self.device)
        rounds = torch.tensor(ROUNDS, device=self.device)[self.round.clamp(max=len(ROUNDS) - 1)]
        pick, place = rounds[:, 0], rounds[:, 1]
        pick_pos, place_pos = cube_pos[rows, pick], cube_pos[rows, place]

        # choose the yaw once per phase that needs a new one (approach: pick cube; move: target cube)
        cur_yaw = hand_yaw(tcp_quat)
        needs_yaw = ~self.yaw_set & ((self.phase == APPROACH) | (self.phase == MOVE))
        if needs_yaw.any():
            for target_index, phase in ((pick, APPROACH), (place, MOVE)):
                sel = needs_yaw & (self.phase == phase)
                for i in sel.nonzero().flatten().tolist():
                    self.yaw[i] = grasp_yaw(cube_pos[i : i + 1], cube_quat[i : i + 1], int(target_index[i]), cur_yaw[i : i + 1])[0]
            self.yaw_set |= needs_yaw

        # target tool position per phase
        target = tcp_pos.clone()
        grip_open = torch.ones(n, dtype=torch.bool, device=self.device)
        grasp_z = (pick_pos[:, 2] - 0.005).clamp(min=0.012)
        place_z = place_pos[:, 2] + BLOCK_SIZE + 0.003  # release the carried cube 3 mm above its resting height
        p = self.phase
        sel = p == APPROACH
        target[sel] = torch.cat([pick_pos[sel, :2], (pick_pos[sel, 2:] + HOVER).clamp(min=0.1)], dim=1)
        sel = p == DESCEND
        target[sel] = torch.cat([pick_pos[sel, :2], grasp_z[sel, None]], dim=1)
        sel = p == CLOSE
        target[sel] = torch.cat([pick_pos[sel, :2], grasp_z[sel, None]], dim=1)
        grip_open[sel] = False
        sel = p == LIFT
        target[sel, 2] = SAFE_Z
        grip_open[sel] = False
        sel = p == MOVE
        target[sel] = torch.cat([place_pos[sel, :2], torch.full_like(place_pos[sel, :1], SAFE_Z)], dim=1)
        grip_open[sel] = False
        sel = p == LOWER
        target[sel] = torch.cat([place_pos[sel, :2], place_z[sel, None]], dim=1)
        grip_open[sel] = False
        sel = (p == RELEASE) | (p == RETREAT) | (p == DONE)
        target[sel, 2] = torch.where(p[sel] == RELEASE, tcp_pos[sel, 2], torch.full_like(tcp_pos[sel, 2], SAFE_Z))
        # while lifting / retreating, hold x-y where they are

        # commands: proportional, clipped
        pos_err = target - tcp_pos
        step = GAIN * pos_err
        norm = step.norm(dim=-1, keepdim=True)
        step = step * (MAX_STEP / norm.clamp_min(MAX_STEP))
        rot_err = _axis_angle(_quat_mul(down_quat(self.yaw), _quat_conj(tcp_quat)))
        turn = GAIN * rot_err
        turn_norm = turn.norm(dim=-1, keepdim=True)
        turn = turn * (MAX_TURN / turn_norm.clamp_min(MAX_TURN))
        gripper = torch.where(grip_open, 1.0, -1.0)
        actions = torch.cat([step / ACTION_SCALE, turn / ACTION_SCALE, gripper[:, None]], dim=-1).float()

        # phase transitions
        dist = pos_err.norm(dim=-1)
        xy_dist = pos_err[:, :2].norm(dim=-1)
        angle = rot_err.norm(dim=-1)
        self.timer += 1
        timed_out = self.timer >= PHASE_TIMEOUT
        advance = torch.zeros(n, dtype=torch.bool, device=self.device)
        advance |= (p == APPROACH) & (((dist < 0.01) & (angle < 0.05)) | timed_out)
        advance |= (p == DESCEND) & ((dist < 0.006) | timed_out)
        advance |= (p == CLOSE) & (self.timer >= GRIP_STEPS)
        advance |= (p == LIFT) & ((pos_err[:, 2].abs() < 0.01) | timed_out)
        advance |= (p == MOVE) & (((xy_dist < 0.006) & (pos_err[:, 2].abs() < 0.02) & (angle < 0.05)) | timed_out)
        advance |= (p == LOWER) & ((dist < 0.005) | timed_out)
        advance |= (p == RELEASE) & (self.timer >= GRIP_STEPS)
        advance |= (p == RETREAT) & ((pos_err[:, 2].abs() < 0.02) | timed_out)
        next_phase = torch.where(advance, p + 1, p)
        # after retreating, start the next round or finish
        finished_round = advance & (p == RETREAT)
        self.round += finished_round.long()
        next_phase = torch.where(finished_round & (self.round < len(ROUNDS)), APPROACH, next_phase)
        next_phase = torch.where(finished_round & (self.round >= len(ROUNDS)), DONE, next_phase)
        self.yaw_set &= ~(advance & ((next_phase == APPROACH) | (next_phase == MOVE)))
        self.timer = torch.where(advance, 0, self.timer)
        self.phase = next_phase
        return actions
