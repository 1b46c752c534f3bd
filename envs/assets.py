"""An offline Isaac Lab asset folder, built from PyPI sources, so that tasks load without NVIDIA's asset server.

Isaac Lab resolves every USD path from `ISAACSIM_ASSET_ROOT` (read once, when `isaaclab.utils.assets` is first
imported). We build a folder that mirrors the server's layout for the assets our tasks use, and point the
variable at it:

    Isaac/IsaacLab/Robots/FrankaEmika/franka_panda.usda        Franka Panda: URDF + meshes from the pybullet 3.2.7
                                                               sdist, converted by urdf-usd-converter, joint drives added
    Isaac/Props/Blocks/{blue,red,green}_block.usd              4.06 cm rigid cubes (rest at z = 0.0203 as the task spawns them)
    Isaac/Props/Mounts/SeattleLabTable/table_instanceable.usd  table top at z = 0 with four legs to the floor
    Isaac/IsaacLab/Environments/Grid/.../default_ground_plane.usda   collision plane + checker texture
    Isaac/IsaacLab/Robots/Classic/Cartpole/cartpole.usd        cart on a rail + pole (joint names as Isaac Lab's)

The folder is built once into a temporary directory and renamed into place, so an interrupted build never
leaves a half folder behind. Textures are referenced by relative paths, so the folder can be moved (e.g.
carried to the GPU machine).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ASSET_VERSION = 1
PYBULLET_SDIST = "pybullet==3.2.7"
_FRANKA_IN_SDIST = "examples/pybullet/gym/pybullet_data/franka_panda"

# Joint drive gains authored into the Franka USD (tasks that leave an actuator's gains at `None` read these).
# Arm: Isaac Lab's Franka PD gains (stiffness 80 N·m/rad, damping 4 N·m·s/rad). Fingers: 2e3 N/m, 1e2 N·s/m,
# stiff enough to hold a block (the converted URDF has no drives at all, which leaves the fingers limp).
FRANKA_ARM_GAINS = (80.0, 4.0)
FRANKA_FINGER_GAINS = (2.0e3, 1.0e2)

BLOCK_SIZE = 0.0406
BLOCK_MASS = 0.05  # kg
BLOCK_COLORS = {"blue": (0.10, 0.25, 0.85), "red": (0.85, 0.10, 0.10), "green": (0.10, 0.70, 0.20)}


def default_asset_dir() -> Path:
    """Where the offline folder lives: `$LEANVLA_ASSET_DIR`, else `~/.cache/leanvla/assets-v<N>`."""
    if env := os.environ.get("LEANVLA_ASSET_DIR"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "leanvla" / f"assets-v{ASSET_VERSION}"


def ensure_offline_assets(root: Path | None = None, verbose: bool = True) -> Path:
    """Return the offline asset folder, building it first if it is missing."""
    root = Path(root) if root is not None else default_asset_dir()
    if (root / "COMPLETE").exists():
        return root
    if verbose:
        print(f"[leanvla] building the offline Isaac Lab asset folder in {root} (once; ~1 min)", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        build_franka(tmp)
        build_blocks(tmp)
        build_table(tmp)
        build_ground_plane(tmp)
        build_cartpole(tmp)
        (tmp / "COMPLETE").write_text(f"leanvla offline assets v{ASSET_VERSION}\n")
        if root.exists():  # a stale folder without COMPLETE: an earlier build was interrupted
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def use_asset_root(root: Path) -> None:
    """Point Isaac Lab at `root`. Must run before `isaaclab.utils.assets` is imported (it reads the variable once)."""
    root = str(Path(root).resolve())
    if "isaaclab.utils.assets" in sys.modules:
        from isaaclab.utils.assets import NUCLEUS_ASSET_ROOT_DIR

        if NUCLEUS_ASSET_ROOT_DIR != root:
            raise RuntimeError(
                f"Isaac Lab was imported with asset root {NUCLEUS_ASSET_ROOT_DIR!r} before leanvla could set it to "
                f"{root!r}. Create leanvla envs before importing isaaclab modules, or use the same --env.assets."
            )
    os.environ["ISAACSIM_ASSET_ROOT"] = root


# --------------------------------------------------------------------------------------------------------------
# USD authoring helpers
# --------------------------------------------------------------------------------------------------------------


def _new_stage(path: Path, default_prim: str):
    from pxr import Usd, UsdGeom, UsdPhysics

    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Usd.Stage.CreateNew(str(path))
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    UsdPhysics.SetStageKilogramsPerUnit(stage, 1.0)
    root = UsdGeom.Xform.Define(stage, f"/{default_prim}")
    stage.SetDefaultPrim(root.GetPrim())
    return stage


def _preview_material(stage, path: str, color, texture: str | None = None, roughness: float = 0.6):
    """A UsdPreviewSurface material; `texture` is a path relative to the layer."""
    from pxr import Gf, Sdf, UsdShade

    material = UsdShade.Material.Define(stage, path)
    shader = UsdShade.Shader.Define(stage, f"{path}/Shader")
    shader.CreateIdAttr("UsdPreviewSurface")
    shader.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).Set(Gf.Vec3f(*color))
    shader.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(roughness)
    if texture is not None:
        reader = UsdShade.Shader.Define(stage, f"{path}/st_reader")
        reader.CreateIdAttr("UsdPrimvarReader_float2")
        reader.CreateInput("varname", Sdf.ValueTypeNames.Token).Set("st")
        image = UsdShade.Shader.Define(stage, f"{path}/diffuse_texture")
        image.CreateIdAttr("UsdUVTexture")
        image.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(texture)
        image.CreateInput("wrapS", Sdf.ValueTypeNames.Token).Set("repeat")
        image.CreateInput("wrapT", Sdf.ValueTypeNames.Token).Set("repeat")
        image.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
        image.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
        shader.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(image.ConnectableAPI(), "rgb")
    material.CreateSurfaceOutput().ConnectToSource(shader.ConnectableAPI(), "surface")
    return material


def _box(stage, path: str, size, center, material=None, collide: bool = True):
    """An axis-aligned box as a scaled unit cube (a primitive every collision pipeline and renderer knows)."""
    from pxr import Gf, UsdGeom, UsdPhysics, UsdShade

    cube = UsdGeom.Cube.Define(stage, path)
    cube.CreateSizeAttr(1.0)
    cube.AddTranslateOp().Set(Gf.Vec3d(*center))
    cube.AddScaleOp().Set(Gf.Vec3f(*size))
    cube.CreateExtentAttr([(-0.5, -0.5, -0.5), (0.5, 0.5, 0.5)])
    if collide:
        UsdPhysics.CollisionAPI.Apply(cube.GetPrim())
    if material is not None:
        UsdShade.MaterialBindingAPI.Apply(cube.GetPrim()).Bind(material)
    return cube


def _write_checker_png(path: Path, colors, squares: int = 8, pixels: int = 16) -> None:
    import numpy as np
    from PIL import Image

    ij = np.indices((squares * pixels, squares * pixels)) // pixels
    pattern = (ij[0] + ij[1]) % 2
    image = np.where(pattern[..., None] == 0, np.array(colors[0]), np.array(colors[1])).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


# --------------------------------------------------------------------------------------------------------------
# The assets
# --------------------------------------------------------------------------------------------------------------


def _pybullet_franka_dir(work: Path) -> Path:
    """Fetch pybullet's source distribution from PyPI (cached) and unpack its Franka Panda URDF and meshes."""
    cache = Path.home() / ".cache" / "leanvla" / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("pybullet-3.2.7.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(cache)]
        result = subprocess.run([*cmd, PYBULLET_SDIST], capture_output=True, text=True)
        sdists = sorted(cache.glob("pybullet-3.2.7.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"Could not download {PYBULLET_SDIST} (the source of the Franka URDF) from PyPI:\n{result.stderr}\n"
                f"Put pybullet-3.2.7.tar.gz into {cache} by hand, or use --env.assets official."
            )
    prefix = f"pybullet-3.2.7/{_FRANKA_IN_SDIST}/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(work, members=members, filter="data")
    return work / prefix


def build_franka(root: Path) -> Path:
    """Franka Panda from pybullet's URDF, converted to USD, with joint drives authored on every joint."""
    from pxr import Usd, UsdPhysics
    from urdf_usd_converter import Converter

    with tempfile.TemporaryDirectory() as work:
        src = _pybullet_franka_dir(Path(work))
        # Name the robot after the file Isaac Lab expects: the converter writes <robot name>.usda.
        urdf = (src / "panda.urdf").read_text().replace('<robot name="panda"', '<robot name="franka_panda"')
        (src / "franka_panda.urdf").write_text(urdf)
        out = root / "Isaac/IsaacLab/Robots/FrankaEmika"
        converter = Converter(layer_structure=True, scene=False, ros_packages=[{"name": "meshes", "path": str(src / "meshes")}])
        converter.convert(str(src / "franka_panda.urdf"), str(out))
    usd = out / "franka_panda.usda"
    if not usd.exists():
        raise RuntimeError(f"urdf-usd-converter did not write {usd}")

    # Author drives where the joints are defined: the payload's physics layer.
    stage = Usd.Stage.Open(str(out / "Payload" / "Physics.usda"))
    deg = math.pi / 180.0  # USD angular drive gains are per degree
    for prim in stage.Traverse():
        name = prim.GetName()
        if prim.IsA(UsdPhysics.RevoluteJoint) and name.startswith("panda_joint"):
            drive = UsdPhysics.DriveAPI.Apply(prim, "angular")
            drive.CreateStiffnessAttr(FRANKA_ARM_GAINS[0] * deg)
            drive.CreateDampingAttr(FRANKA_ARM_GAINS[1] * deg)
            drive.CreateMaxForceAttr(87.0 if name[-1] in "1234" else 12.0)
        elif prim.IsA(UsdPhysics.PrismaticJoint) and name.startswith("panda_finger_joint"):
            drive = UsdPhysics.DriveAPI.Apply(prim, "linear")
            drive.CreateStiffnessAttr(FRANKA_FINGER_GAINS[0])
            drive.CreateDampingAttr(FRANKA_FINGER_GAINS[1])
            drive.CreateMaxForceAttr(200.0)
    stage.GetRootLayer().Save()
    return usd


def build_blocks(root: Path) -> None:
    from pxr import Gf, UsdPhysics

    for color_name, color in BLOCK_COLORS.items():
        path = root / f"Isaac/Props/Blocks/{color_name}_block.usd"
        stage = _new_stage(path, "Block")
        body = stage.GetPrimAtPath("/Block")
        UsdPhysics.RigidBodyAPI.Apply(body)
        mass = UsdPhysics.MassAPI.Apply(body)
        mass.CreateMassAttr(BLOCK_MASS)
        mass.CreateCenterOfMassAttr(Gf.Vec3f(0.0, 0.0, 0.0))
        material = _preview_material(stage, "/Block/Looks/Color", color, roughness=0.4)
        _box(stage, "/Block/Cube", (BLOCK_SIZE,) * 3, (0.0, 0.0, 0.0), material)
        stage.GetRootLayer().Save()


def build_table(root: Path) -> None:
    """A 1.2 m x 0.8 m table (long side along its local x) whose top surface is its origin."""
    path = root / "Isaac/Props/Mounts/SeattleLabTable/table_instanceable.usd"
    stage = _new_stage(path, "Table")
    texture = "Textures/wood.png"
    _write_checker_png(path.parent / texture, [(150, 111, 51), (140, 102, 45)], squares=16, pixels=8)
    wood = _preview_material(stage, "/Table/Looks/Wood", (1.0, 1.0, 1.0), texture=texture)
    metal = _preview_material(stage, "/Table/Looks/Metal", (0.35, 0.35, 0.38), roughness=0.3)
    length, width, thickness, height = 1.2, 0.8, 0.04, 1.05
    _box(stage, "/Table/Top", (length, width, thickness), (0.0, 0.0, -thickness / 2), wood)
    for i, (sx, sy) in enumerate([(1, 1), (1, -1), (-1, 1), (-1, -1)]):
        center = (sx * (length / 2 - 0.05), sy * (width / 2 - 0.05), -(height + thickness) / 2)
        _box(stage, f"/Table/Leg{i}", (0.05, 0.05, height - thickness), center, metal)
    stage.GetRootLayer().Save()


def build_ground_plane(root: Path) -> None:
    """Isaac Lab's default ground plane layout: /Environment/Geometry (textured quad), a Plane collider, /Looks/theGrid."""
    from pxr import Gf, Sdf, UsdGeom, UsdPhysics, UsdShade

    path = root / "Isaac/IsaacLab/Environments/Grid/default_ground_plane_checker_v1/default_ground_plane.usda"
    stage = _new_stage(path, "GroundPlane")
    texture = "Textures/checker.png"
    _write_checker_png(path.parent / texture, [(90, 90, 90), (130, 130, 130)], squares=2, pixels=64)
    grid = _preview_material(stage, "/GroundPlane/Looks/theGrid", (1.0, 1.0, 1.0), texture=texture, roughness=0.9)
    environment = UsdGeom.Xform.Define(stage, "/GroundPlane/Environment")
    environment.AddScaleOp().Set(Gf.Vec3f(1.0, 1.0, 1.0))  # Isaac Lab rescales this to the configured size / 100
    mesh = UsdGeom.Mesh.Define(stage, "/GroundPlane/Environment/Geometry")
    mesh.CreatePointsAttr([(-50, -50, 0), (50, -50, 0), (50, 50, 0), (-50, 50, 0)])
    mesh.CreateFaceVertexCountsAttr([4])
    mesh.CreateFaceVertexIndicesAttr([0, 1, 2, 3])
    mesh.CreateNormalsAttr([(0, 0, 1)] * 4)
    mesh.CreateExtentAttr([(-50, -50, 0), (50, 50, 0)])
    st = UsdGeom.PrimvarsAPI(mesh).CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex)
    st.Set([(-25, -25), (25, -25), (25, 25), (-25, 25)])
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(grid)
    plane = UsdGeom.Plane.Define(stage, "/GroundPlane/CollisionPlane")
    plane.CreateAxisAttr("Z")
    plane.CreatePurposeAttr(UsdGeom.Tokens.guide)
    UsdPhysics.CollisionAPI.Apply(plane.GetPrim())
    stage.GetRootLayer().Save()


def build_cartpole(root: Path) -> None:
    """Isaac Lab's cartpole: a fixed rail, a cart on prismatic joint `slider_to_cart`, a pole on revolute `cart_to_pole`."""
    from pxr import Gf, UsdGeom, UsdPhysics

    path = root / "Isaac/IsaacLab/Robots/Classic/Cartpole/cartpole.usd"
    stage = _new_stage(path, "cartpole")
    UsdPhysics.ArticulationRootAPI.Apply(stage.GetPrimAtPath("/cartpole"))
    rail_mat = _preview_material(stage, "/cartpole/Looks/Rail", (0.3, 0.3, 0.3))
    cart_mat = _preview_material(stage, "/cartpole/Looks/Cart", (0.2, 0.4, 0.8))
    pole_mat = _preview_material(stage, "/cartpole/Looks/Pole", (0.9, 0.6, 0.1))

    def body(name: str, mass: float, translate=(0.0, 0.0, 0.0)):
        xform = UsdGeom.Xform.Define(stage, f"/cartpole/{name}")
        xform.AddTranslateOp().Set(Gf.Vec3d(*translate))
        UsdPhysics.RigidBodyAPI.Apply(xform.GetPrim())
        UsdPhysics.MassAPI.Apply(xform.GetPrim()).CreateMassAttr(mass)
        return xform.GetPrim()

    rail = body("rail", 5.0)
    _box(stage, "/cartpole/rail/geometry", (8.0, 0.03, 0.03), (0.0, 0.0, 0.0), rail_mat, collide=False)
    cart = body("cart", 1.0)
    _box(stage, "/cartpole/cart/geometry", (0.2, 0.25, 0.2), (0.0, 0.0, 0.0), cart_mat, collide=False)
    pole = body("pole", 0.1, translate=(0.0, 0.15, 0.0))
    UsdPhysics.MassAPI(pole).CreateCenterOfMassAttr(Gf.Vec3f(0.0, 0.0, 0.5))
    _box(stage, "/cartpole/pole/geometry", (0.04, 0.04, 1.0), (0.0, 0.0, 0.5), pole_mat, collide=False)

    fixed = UsdPhysics.FixedJoint.Define(stage, "/cartpole/rootJoint")
    fixed.CreateBody1Rel().SetTargets([rail.GetPath()])
    slider = UsdPhysics.PrismaticJoint.Define(stage, "/cartpole/slider_to_cart")
    slider.CreateAxisAttr("X")
    slider.CreateBody0Rel().SetTargets([rail.GetPath()])
    slider.CreateBody1Rel().SetTargets([cart.GetPath()])
    slider.CreateLowerLimitAttr(-4.0)
    slider.CreateUpperLimitAttr(4.0)
    hinge = UsdPhysics.RevoluteJoint.Define(stage, "/cartpole/cart_to_pole")
    hinge.CreateAxisAttr("Y")
    hinge.CreateBody0Rel().SetTargets([cart.GetPath()])
    hinge.CreateBody1Rel().SetTargets([pole.GetPath()])
    hinge.CreateLocalPos0Attr(Gf.Vec3f(0.0, 0.15, 0.0))
    stage.GetRootLayer().Save()


if __name__ == "__main__":
    print(ensure_offline_assets())
