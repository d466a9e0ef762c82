"""Wan-Fun Control-Camera (first frame + camera move) with a converted folder.

Wan2.1-Fun-V1.1-1.3B/14B-Control-Camera or Wan2.2-Fun-A14B-Control-Camera, converted to Diffusers.  The camera is a
direction (DiffSynth-Studio's trajectories) or a CameraCtrl pose file (one ``frame fx fy cx cy 0 0 w2c[3x4]`` row per
frame; a first line that is not 19 numbers, e.g. the clip URL, is skipped):

    python examples/fun_camera_control.py /ckpt/Wan2.1-Fun-V1.1-1.3B-Control-Camera-diffusers street.png \
        "a quiet street at dusk" --direction Left --output fun_camera.mp4
    python examples/fun_camera_control.py /ckpt/... street.png "a quiet street" --poses orbit.txt
"""

import argparse

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_image

import diffusers_wan_ext  # noqa: F401  (registers WanFunCameraControlPipeline & co. with Diffusers)
from diffusers_wan_ext.utils.camera import CAMERA_DIRECTIONS, DEFAULT_CAMERA_SPEED


def read_pose_file(path, num_frames):
    """The first ``num_frames`` CameraCtrl rows (19 numbers each) of a pose text file."""
    rows = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            try:
                row = [float(v) for v in fields]
            except ValueError:
                continue
            if len(row) == 19:
                rows.append(row)
    if len(rows) < num_frames:
        raise SystemExit(f"{path}: {len(rows)} pose rows, fewer than --num-frames {num_frames}")
    return rows[:num_frames]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan-Fun Control-Camera: video from a first frame and a camera move.")
    parser.add_argument("model", help="converted Fun Control-Camera folder (WanFunCameraControlPipeline)")
    parser.add_argument("image", help="first frame (path or URL)")
    parser.add_argument("prompt")
    camera = parser.add_mutually_exclusive_group(required=True)
    camera.add_argument("--direction", choices=CAMERA_DIRECTIONS, help="generated trajectory")
    camera.add_argument("--poses", help="CameraCtrl pose file (one row per frame)")
    parser.add_argument("--speed", type=float, default=DEFAULT_CAMERA_SPEED, help="per-frame step of --direction")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", default="fun_camera.mp4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81, help="4n + 1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)

    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    video = pipe(
        image=load_image(args.image),
        camera_control_direction=args.direction,
        camera_control_speed=args.speed,
        camera_poses=read_pose_file(args.poses, args.num_frames) if args.poses else None,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    print(export_to_video(video, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
